"""Quantization methods behind one interface (RTN, SmoothQuant, GPTQ, AWQ, QuantVLA, QVLA, DA-PTQ)."""
