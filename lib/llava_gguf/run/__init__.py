"""Where a run's things are and what they were made from: the workspace, params, the step registry,
fingerprints, stamps, partial files, disk space, the machine. It may import model/ only.
"""
