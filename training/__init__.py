"""tlreg.training"""
