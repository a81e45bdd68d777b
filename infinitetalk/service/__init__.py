"""Hosted job API (submit / status / result / cancel with Bearer auth) served from ComfyUI's server.

Everything but `comfy_engine.py` and `routes.register_with_comfyui` runs without ComfyUI.
"""
