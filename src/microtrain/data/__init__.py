"""microtrain.data"""
