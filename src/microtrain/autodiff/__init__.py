"""microtrain.autodiff"""
