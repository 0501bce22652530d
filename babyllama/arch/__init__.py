"""Architectures: each module is one architecture's tensor inventory (names, shapes, tying, and
the names other formats give the same tensors). The engine, the formats and the torch model all
take their tensor lists from here."""
