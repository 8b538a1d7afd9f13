"""Explain: Grad-CAM on the full model, overlays, face focus and deletion curves, the explain job and report."""
