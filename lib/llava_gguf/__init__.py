"""LLaVA 1.6 Vicuna 7B to GGUF for llama.cpp: conversion, quantization and board benchmarks.

One module per stage (download, surgery, vision, text, quantize, evaluate); notebooks in
notebooks/ and the CLI (`python -m llava_gguf`) call the same functions.
"""
__version__ = "0.1.0"
