"""microtrain.frontends"""
