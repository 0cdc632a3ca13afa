"""_history"""
