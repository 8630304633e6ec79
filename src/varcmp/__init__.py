"""varcmp: video anomaly retrieval with frozen cross-modal encoders (VarCMP)."""

__version__ = "0.1.0"
