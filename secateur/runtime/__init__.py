"""secateur.runtime"""
