// The key travels only in the form's body; a refused one comes back here with ?failed=1.
if (new URLSearchParams(location.search).has("failed")) {
  document.getElementById("failed").hidden = false;
}
