"""What llama.cpp's outputs are held against: PyTorch references of the vision tower, the text
model and LLaVA 1.6's image sequence. It may import model/ only.
"""
