// llm.c's own loader and forward on a GPT-2 checkpoint: train_gpt2.c's gpt2_build_from_checkpoint,
// gpt2_forward and llmc/tokenizer.h's tokenizer_init / tokenizer_decode, nothing of babyllama's.
// Usage: logits MODEL.bin TOKENIZER.bin OUT.f32 TOKEN...   writes (T, V) float32 logits to OUT.f32
// and prints each token's decoded bytes in brackets (what llm.c would print for it).
#define TESTING  // train_gpt2.c then leaves out its main()
#include "train_gpt2.c"

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s model.bin tokenizer.bin out.f32 token...\n", argv[0]); return 2; }
    GPT2 model;
    gpt2_build_from_checkpoint(&model, argv[1]);
    Tokenizer tokenizer;
    tokenizer_init(&tokenizer, argv[2]);
    if (!tokenizer.init_ok) { return 1; }
    int T = argc - 4;
    int *tokens = (int *)mallocCheck(T * sizeof(int));
    for (int t = 0; t < T; t++) { tokens[t] = atoi(argv[4 + t]); }
    gpt2_forward(&model, tokens, NULL, 1, T);
    size_t V = model.config.vocab_size, Vp = model.config.padded_vocab_size;
    FILE *out = fopenCheck(argv[3], "wb");
    for (int t = 0; t < T; t++) { fwrite(model.acts.logits + t * Vp, sizeof(float), V, out); }
    fcloseCheck(out);
    printf("llm.c decodes:");
    for (int t = 0; t < T; t++) { printf(" [%s]", tokenizer_decode(&tokenizer, tokens[t])); }
    printf("\n");
    tokenizer_free(&tokenizer);
    gpt2_free(&model);
    free(tokens);
    return 0;
}
