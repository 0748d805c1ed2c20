"""microtrain.sparse"""
