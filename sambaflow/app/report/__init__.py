"""`python -m sambaflow report PEF`: one self-contained HTML page of what a compile made.

`facts` reads the PEF (and the compile log beside it), `measure` runs its programs on made-up
inputs when asked, `page` writes the HTML (inline SVG and a little inline script, nothing fetched).
"""
