"""Step 07's machinery: its configurations and statistics, the quant types worth timing here, the
mmproj variants and the products it writes. Below steps/, above checks/.
"""
