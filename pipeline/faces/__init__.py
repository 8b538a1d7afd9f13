"""Faces: find faces in photos (MTCNN) or take labelled boxes, and cut each out in UTKFace's framing."""
