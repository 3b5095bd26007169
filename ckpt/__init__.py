"""tlreg.ckpt"""
