"""HF <-> Megatron bridge: the one mapping table, HF file I/O, TP/PP distribution, conversion and export streams."""
