"""What the Streamlit WebUI (``DiffSynth_Studio.py``, ``pages/``) does, without Streamlit.

The pages only draw widgets; the decisions live here so that they are tested without a
browser: which model files a picker offers (``choices``), how the Video Creator's form
becomes a runner config (``video_form``), image generation with models kept per session
(``image_session``), and video renders as background worker processes that outlive the
browser (``runs``, ``worker``). Nothing in this package imports streamlit.
"""
