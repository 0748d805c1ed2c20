"""microtrain.runtime"""
