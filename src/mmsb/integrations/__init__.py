"""Integrations of MMSB with other frameworks.

Each integration is a module of its own that imports its framework when it is imported
(``mmsb.integrations.langgraph`` needs ``mmsb[langgraph]``); importing ``mmsb`` or this
package imports none of them.
"""
