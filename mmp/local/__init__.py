"""The embedded local stack (`mmp up`) and the demo that tells the whole story on it."""
