"""The browser console's static files (index.html, app.js, style.css), served as they are by
server/api/console.py: no build step, nothing fetched from elsewhere."""
