"""microtrain.codegen"""
