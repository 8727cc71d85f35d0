"""Publishing a converted folder: its model card (``card``) and the upload to the Hugging Face Hub (``push``)."""
