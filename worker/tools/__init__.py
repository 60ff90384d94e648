"""Standalone scripts run in side virtual environments (quantization tools pin their own torch)."""
