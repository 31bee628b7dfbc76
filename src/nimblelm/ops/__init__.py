"""Pure tensor functions (layout [B, T, H, D]); no nn.Module of ours is imported here."""
