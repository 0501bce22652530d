"""The hand-written trainer (`babyllama train --backend numba`): llm.c's idea in NumPy + Numba, every
operation's forward and backward written out, no autograd, checked against torch
(tests/test_grad_*.py). Read in this order:

  ops.py      the operations, each forward with its backward (Numba kernels; matmuls by NumPy)
  layout.py   all parameters in one flat buffer (and gradients, AdamW moments in the same layout)
  model.py    what both models share: activation buffers, the final norm, classifier and loss
  llama.py    the Llama forward and backward, top to bottom
  gpt2.py     the GPT-2 forward and backward
  adamw.py    gradient clipping and AdamW, torch's semantics
  state.py    the trainer's state as `babyllama train`'s ckpt.pt (torch's state_dict layouts)
  trainer.py  the run: training/loop.py's step loop with this arithmetic

The compute never touches torch; torch is imported only to write and read ckpt.pt (a torch.save
file) and to draw the initial weights, so that a seed gives the same model on either backend.
"""
