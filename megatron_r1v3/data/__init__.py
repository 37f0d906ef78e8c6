"""Data: sample records, InternVL dynamic tiling, image decoding (DALI and Pillow), synthetic toy task."""
