"""microtrain.ir"""
