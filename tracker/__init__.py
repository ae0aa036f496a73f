"""Face tracking: the ICT face model, face parameters, landmarks, fitting, gaze and transfer."""
