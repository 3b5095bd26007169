"""tlreg.cli"""
