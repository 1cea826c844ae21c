"""Real evaluation sets fetched by ``mmssl data fetch NAME`` (``mmssl.data.fetch``): importing this
package registers each one and its ``data=real-NAME`` preset."""
from mmssl.data.real import debian_descriptions, fonts, fortunes, klettres, qm9  # noqa: F401  (imports register the sets)
