"""optforge runtime: loads artifacts and runs them (quantized layers, model loader; serving comes later)."""
