// Talks to kiln's JSON API exactly as other clients do: Bearer key from sessionStorage.

const KEY = "kiln.apiKey";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
  get needsKey() {
    return this.status === 401 || this.status === 403;
  }
}

function authHeaders() {
  const key = apiKey.get();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The API's own words: {"error": {"message"}} natively, {"detail"} from FastAPI's validation.
function messageOf(status, text) {
  try {
    const body = JSON.parse(text);
    if (body.error && typeof body.error === "object") return body.error.message;
    if (typeof body.error === "string") return body.error;
    if (body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    // not JSON: fall through
  }
  return `HTTP ${status}${text ? `: ${text.slice(0, 200)}` : ""}`;
}

async function call(method, path) {
  let response;
  try {
    response = await fetch(path, { method, headers: authHeaders(), cache: "no-store" });
  } catch {
    throw new ApiError(0, "the server did not answer (network error)");
  }
  const text = await response.text();
  if (!response.ok) throw new ApiError(response.status, messageOf(response.status, text));
  return text ? JSON.parse(text) : null;
}

export const getJSON = (path) => call("GET", path);
export const remove = (path) => call("DELETE", path);

// POST /engines with upload progress (fetch cannot report it; XMLHttpRequest can).
export function uploadEngine(form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/engines");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else reject(new ApiError(xhr.status, messageOf(xhr.status, xhr.responseText)));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "the upload was interrupted (network error)")));
    xhr.send(form);
  });
}
