"""What runs the steps and what comes after them: the papermill runner, the preflight, the arm64
rehearsal and publishing. Only cli.py stands above it.
"""
