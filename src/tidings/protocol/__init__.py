"""Wire formats: how publications become frames and how client frames become actions."""
