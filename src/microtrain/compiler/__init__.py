"""microtrain.compiler"""
