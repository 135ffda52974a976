"""`melanogan serve`: a local web app to use a trained classifier and to collect human judgements.

Pages: predict (upload -> probability, decision, Grad-CAM), a blinded visual Turing test of real
versus synthetic images, and a prediction review; answers are kept in SQLite and exported as CSV.
"""
