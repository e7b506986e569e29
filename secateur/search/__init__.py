"""secateur.search"""
