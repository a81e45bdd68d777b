"""Hosted job API (submit / status / result / cancel with Bearer auth) served from ComfyUI's server.

Everything but `comfy_engine.py` and `app.register_with_comfyui` runs without ComfyUI; `app.py` is the front door.
"""
