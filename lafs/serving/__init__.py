"""Using the recogniser: photos in, faces, embeddings and same/different decisions out, without torch.

``faces`` is the one embedding path (SCRFD detection, face selection, ArcFace alignment, the exported ONNX
recogniser, flip-sum TTA, L2 norm) shared by ``lafs embed``, ``lafs verify`` and the MLflow pyfunc model that
``register`` logs (``pyfunc``); ``load`` turns a ``--model`` argument (a folder, ``models:/...``,
``runs:/...``) into that path.
"""
