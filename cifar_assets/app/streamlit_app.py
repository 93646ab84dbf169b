"""The script that `streamlit run` executes; `cifar-app` starts it, the pages are in ui.py."""

from cifar_assets.app.ui import main

main()
