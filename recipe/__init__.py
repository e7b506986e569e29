"""secateur.recipe"""
