"""tlreg.registry"""
