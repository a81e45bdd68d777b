"""Audio input: PyAV decoding, resampling, loudness normalisation, speaker placement by order."""
