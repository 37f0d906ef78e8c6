"""The R1V3 VLM on megatron-core: InternViT, pixel-shuffle connector, Qwen2.5 decoder, and their composition."""
