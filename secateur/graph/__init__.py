"""secateur.graph"""
