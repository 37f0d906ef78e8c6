"""Supervised fine-tuning: cold-start SFT on reasoning traces and connector-only tuning."""
