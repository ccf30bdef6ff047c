"""The FedMITR web app (Gradio). Start it with ``python app/app.py``; it calls the ``fedmitr`` library."""
