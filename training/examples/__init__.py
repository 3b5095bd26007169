"""tlreg.training.examples"""
